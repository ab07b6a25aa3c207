"""lc_kernels: LayerCollapse for PyTorch — collapsible MLPs, exact and fitted collapse, fused kernels."""
from ._version import __version__  # noqa: E402
from .compress import CompressReport, compress  # noqa: E402
from .finetune import FinetuneHistory, finetune  # noqa: E402
from .integrations import register_handler  # noqa: E402
from .nn import CollapsibleActivation, LCChain, LCFusedMLP, LCGatedMLP  # noqa: E402
from .planning import CollapsePlan, JointPlan, SitePlan, plan_collapse  # noqa: E402
from .speedup import SpeedupReport, speedup  # noqa: E402
from .regularizer import CollapseRegularizer, alpha_param_groups, collapse_loss  # noqa: E402
from .transforms import (collapse_, load_collapsed, load_pretrained, prepare_, save_collapsed,  # noqa: E402
                         save_pretrained, strip_)
from .warmup import WarmupReport, warmup  # noqa: E402

__all__ = [
    "__version__",
    "CollapsibleActivation",
    "LCFusedMLP",
    "LCChain",
    "LCGatedMLP",
    "prepare_",
    "register_handler",
    "collapse_loss",
    "CollapseRegularizer",
    "alpha_param_groups",
    "plan_collapse",
    "CollapsePlan",
    "SitePlan",
    "JointPlan",
    "collapse_",
    "save_collapsed",
    "load_collapsed",
    "save_pretrained",
    "load_pretrained",
    "strip_",
    "compress",
    "CompressReport",
    "speedup",
    "SpeedupReport",
    "finetune",
    "FinetuneHistory",
    "warmup",
    "WarmupReport",
]
