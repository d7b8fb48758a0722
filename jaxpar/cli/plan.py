"""`scripts/run.py plan`: rank every layout of the devices by predicted bytes, collectives and
step time; compile the best to check."""

from jaxpar import config as config_lib
from jaxpar.cli import prologue
from jaxpar.cli.prologue import say
from jaxpar.errors import UserError


def add_parser(commands) -> None:
  from jaxpar.hardware import PRESETS
  sub = prologue.add_command(commands, "plan", "rank every layout of the devices by predicted "
                             "bytes, collectives and step time; compile the best to check",
                             "configs/gpt2.yaml")
  sub.add_argument("--hardware", choices=tuple(PRESETS), default=None,
                   help="the device to plan for (default: the one present; cpu here)")
  sub.add_argument("--device-memory", type=float, metavar="GB",
                   help="memory per device in GiB (default: the hardware's)")
  sub.add_argument("--flops", type=float, metavar="TFLOPS", help="peak TFLOP/s per device")
  sub.add_argument("--hbm-gbps", type=float, metavar="X", help="memory bandwidth, GB/s")
  sub.add_argument("--link-gbps", type=float, metavar="Y",
                   help="one-way link bandwidth to a neighbour, GB/s")
  sub.add_argument("--compile", type=int, default=3, metavar="K",
                   help="compile the K best plans and print predicted against compiled "
                        "(default 3; 0: none)")
  sub.add_argument("--chart", metavar="OUT.png",
                   help="save the ranking and predicted-against-compiled as a PNG chart")


def run(args, config: config_lib.Config) -> dict:
  import jax

  from jaxpar import plan as plan_lib
  from jaxpar import plan_report
  n = args.devices or len(jax.devices())
  device = jax.devices()[0]
  preset = args.hardware or plan_lib.hardware_for(device.device_kind, device.platform)
  hw = plan_lib.for_devices(preset, n, tflops=args.flops, hbm_gbps=args.hbm_gbps,
                            link_gbps=args.link_gbps, memory_gib=args.device_memory)
  if args.compile < 0:
    raise UserError(f"--compile {args.compile}: must be 0 or more")
  return {"command": "plan", **plan_report.run(config, n_devices=n, hw=hw,
                                               compile_top=args.compile, chart=args.chart,
                                               say=say)}
