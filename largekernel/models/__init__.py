"""Model families, one file each; importing registers every model with timm."""
