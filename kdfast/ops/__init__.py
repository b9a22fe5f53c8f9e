"""Every op's registration, one module per op (``kdfast/ops/<op>.py``): its custom ops
(fake kernels, autograd), every backend's implementation declared to :mod:`kdfast._dispatch`,
and its sample inputs for the contract suite (:mod:`kdfast.ops._samples`). Implementations
of backends that are unavailable in this process are skipped.

Every module here whose name does not start with an underscore is imported, so a new op
needs no edit to this file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from kdfast.ops import _autocast  # noqa: E402

# Keep last: derives autocast rules from every op registered by the imports above.
_autocast.register_all()
