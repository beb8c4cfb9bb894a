"""largekernel: large-kernel ConvNets with fast depthwise kernels, registered in timm."""
from largekernel import models  # noqa: F401  (registers the models with timm)
from largekernel.layers.reparam import reparameterize
from largekernel.models import CheckpointError, create_model, load_checkpoint

__version__ = "0.1.0"
__all__ = ["CheckpointError", "create_model", "load_checkpoint", "reparameterize", "__version__"]
