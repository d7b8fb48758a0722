"""The vocabulary: mesh axis names and logical dimension names, spelled once.

Models annotate every parameter and activation with logical names from this module;
`jaxpar.rules` maps them onto the mesh axes. Nothing else spells these strings.
"""

# Mesh axes, in mesh order.
DATA = "data"
STAGE = "stage"
EXPERT = "expert"
MODEL = "model"
MESH_AXES = (DATA, STAGE, EXPERT, MODEL)

# Logical dimensions of the decoders (`jaxpar.models.gpt`, `jaxpar.models.llama`).
BATCH = "batch"        # B: sequences (or images) in a batch
SEQ = "seq"            # T: positions in a sequence (and the position table)
EMBED = "embed"        # D: model width, in parameters
ACT_EMBED = "act_embed"  # D: model width of activations (the residual stream). Its own name,
                         # so parameters can be split over `data` (FSDP: rules.embed=data)
                         # while the activations' batch already is.
HEADS = "heads"        # N: attention heads
HEAD_DIM = "head_dim"  # H: width of one head
KV_HEADS = "kv_heads"  # K: key/value heads (grouped-query attention)
MLP = "mlp"            # F: hidden width of the MLP
VOCAB = "vocab"        # V: vocabulary (padded)
LAYERS = "layers"      # L: stacked blocks
EXPERTS = "experts"    # E: the experts of a mixture-of-experts MLP (`jaxpar.models.moe`)

# Logical dimensions of image classification (`jaxpar.models.cnn`, NHWC images; the CNN lists
# the ones it uses in `jaxpar.models.cnn_config.NAMES`). A residual block's first conv is
# column-parallel (its output `filters` split), its second row-parallel (input `filters`
# split), so the residual stream's `channels` stay whole: one all-reduce per block, as in an
# MLP.
HEIGHT = "height"      # H: image rows (-> a mesh axis for spatial partitioning into strips)
WIDTH = "width"        # W: image columns
COLOR = "color"        # I: channels of the input image (3 for RGB, 1 for grey)
CHANNELS = "channels"  # C: width of the residual stream, in parameters
ACT_CHANNELS = "act_channels"  # C: the residual stream's channels in activations
FILTERS = "filters"    # F: inner width of a residual block (column/row-parallel convs)
KERNEL = "kernel"      # X, Y: the rows and columns of a convolution window
CLASSES = "classes"    # K: classifier outputs

# Every name, decoders' then images'. They are spelled here, not by each model, so that a
# config's rules table is checked (and the default table complete) before any model loads.
LOGICAL_NAMES = (BATCH, SEQ, EMBED, ACT_EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, LAYERS,
                 EXPERTS,
                 HEIGHT, WIDTH, COLOR, CHANNELS, ACT_CHANNELS, FILTERS, KERNEL, CLASSES)

# The default ordered rule table: logical name -> mesh axis (None: replicated on purpose).
# Megatron layout: query and key/value heads and MLP hidden split over `model` (column-parallel
# in, row-parallel out), vocabulary split over `model` (vocab-parallel embedding and logits),
# batch over `data` and `expert`, the layer stack over `stage`, experts over `expert` (outside
# the mixture-of-experts MLPs the `expert` axis splits the batch like `data`; inside them each
# device's tokens go to the devices of their experts by all-to-all). Images over `data`, block
# filters over `model`; `rules.height=stage` splits every image into strips of rows over `stage`
# (XLA exchanges the halo rows between neighbours).
DEFAULT_RULES = (
    (BATCH, (DATA, EXPERT)),
    (SEQ, None),
    (EMBED, None),
    (ACT_EMBED, None),
    (HEADS, MODEL),
    (KV_HEADS, MODEL),
    (HEAD_DIM, None),
    (MLP, MODEL),
    (VOCAB, MODEL),
    (LAYERS, STAGE),
    (EXPERTS, EXPERT),
    (HEIGHT, None),
    (WIDTH, None),
    (COLOR, None),
    (CHANNELS, None),
    (ACT_CHANNELS, None),
    (FILTERS, MODEL),
    (KERNEL, None),
    (CLASSES, None),
)
