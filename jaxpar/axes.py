"""The vocabulary: mesh axis names and logical dimension names, spelled once.

Models annotate every parameter and activation with logical names from this module;
`jaxpar.rules` maps them onto the mesh axes. Nothing else spells these strings.
"""

# Mesh axes, in mesh order.
DATA = "data"
STAGE = "stage"
MODEL = "model"
MESH_AXES = (DATA, STAGE, MODEL)

# Logical dimensions.
BATCH = "batch"        # B: sequences (or images) in a batch
SEQ = "seq"            # T: positions in a sequence (and the position table)
EMBED = "embed"        # D: model width
HEADS = "heads"        # N: attention heads
HEAD_DIM = "head_dim"  # H: width of one head
MLP = "mlp"            # F: hidden width of the MLP
VOCAB = "vocab"        # V: vocabulary (padded)
LAYERS = "layers"      # L: stacked blocks

LOGICAL_NAMES = (BATCH, SEQ, EMBED, HEADS, HEAD_DIM, MLP, VOCAB, LAYERS)

# The default ordered rule table: logical name -> mesh axis (None: replicated on purpose).
# Megatron layout: heads and MLP hidden split over `model` (column-parallel in, row-parallel
# out), vocabulary split over `model` (vocab-parallel embedding and logits), batch over
# `data`, the layer stack over `stage`.
DEFAULT_RULES = (
    (BATCH, DATA),
    (SEQ, None),
    (EMBED, None),
    (HEADS, MODEL),
    (HEAD_DIM, None),
    (MLP, MODEL),
    (VOCAB, MODEL),
    (LAYERS, STAGE),
)
