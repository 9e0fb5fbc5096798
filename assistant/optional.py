"""bitsandbytes is imported only where 8-bit or 4-bit loading asks for it.

peft imports bitsandbytes as soon as peft itself is imported (peft.helpers), whether or not a model is
quantized. On a CPU that import costs about a second (it pulls in torch's inductor) and prints "Failed
to load CPU gemm_4bit_forward from kernels-community" to every start of the app, the trainer and the
benchmarks. Until `require_bitsandbytes()` is called, `import bitsandbytes` fails as if it were not
installed (Python's own `sys.modules[name] = None` rule), so peft and transformers take their
no-bitsandbytes paths; `require_bitsandbytes()` undoes that and clears their cached availability checks.
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType

logger = logging.getLogger(__name__)

NAME = "bitsandbytes"
# Availability checks that peft and transformers cache (functools.lru_cache) after their first call.
_CACHED_CHECKS = {
    "peft.import_utils": ("is_bnb_available", "is_bnb_4bit_available"),
    "transformers.utils.import_utils": ("is_bitsandbytes_available",),
}
# Modules that bind `bnb` when imported, only if bitsandbytes is importable then.
_BOUND_AT_IMPORT = ("peft.helpers", "transformers.integrations.bitsandbytes")


def hold_back_bitsandbytes() -> None:
    """Make `import bitsandbytes` fail until require_bitsandbytes() (no-op once it is imported)."""
    if NAME not in sys.modules:
        sys.modules[NAME] = None  # type: ignore[assignment]


def require_bitsandbytes() -> ModuleType:
    """Import bitsandbytes for 8/4-bit loading, and let peft and transformers see it from now on."""
    if NAME in sys.modules and sys.modules[NAME] is None:
        del sys.modules[NAME]
    module = importlib.import_module(NAME)
    for module_name, checks in _CACHED_CHECKS.items():
        owner = sys.modules.get(module_name)
        for check in checks:
            cache_clear = getattr(getattr(owner, check, None), "cache_clear", None)
            if cache_clear is not None:
                cache_clear()
    for module_name in _BOUND_AT_IMPORT:
        owner = sys.modules.get(module_name)
        if owner is not None and getattr(owner, "bnb", None) is None:  # imported while held back
            owner.bnb = module
    logger.debug("bitsandbytes %s imported for 8/4-bit loading", getattr(module, "__version__", "?"))
    return module
