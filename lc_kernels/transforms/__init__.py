"""What CHANGES a model: ``prepare_`` (make sites collapsible), ``collapse_`` (apply a plan),
``save_collapsed`` / ``load_collapsed`` (checkpoints), ``save_pretrained`` / ``load_pretrained`` (a compressed
Hugging Face model as a self-contained directory), ``strip_`` (plain PyTorch for serving)."""
from .checkpoint import load_collapsed, read_checkpoint, rebuild_, save_collapsed
from .collapse import apply_site, collapse_
from .prepare import prepare_
from .pretrained import load_pretrained, save_pretrained
from .strip import plain_site, strip_

__all__ = ["prepare_", "collapse_", "apply_site", "save_collapsed", "load_collapsed", "read_checkpoint", "rebuild_", "strip_",
           "plain_site", "save_pretrained", "load_pretrained"]
