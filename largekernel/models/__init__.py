"""Model families, one file each; importing registers every model with timm."""
from largekernel.models import mobilenetv2, replknet, shiftwise, slak, unireplknet  # noqa: F401
from largekernel.models._factory import create_model
from largekernel.models._helpers import CheckpointError, load_checkpoint, read_state_dict

__all__ = ["create_model", "CheckpointError", "load_checkpoint", "read_state_dict"]
