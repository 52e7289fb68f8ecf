"""One cache stamp for all the numba code of the fused step.

numba keys its on-disk cache of a function on the source file that defines it (numba 0.68: a
hash of that file's contents; earlier versions: its time stamp and size). Our fused modules
call into each other: ``_tiles3x3.pass2`` inlines the register code of ``_vec16``, the
lane helpers of ``_maths3x3`` and ``_lanes``, the team entry points of ``_team`` compile all of
``_tiles3x3`` and ``_columns`` into themselves. A cached caller would therefore keep
the old code of a callee whose file changed while its own did not: after an upgrade of the
package (whose ``__pycache__`` outlives the files it replaces) or an edit in a working copy.

``install()`` puts a locator in front of numba's list that claims the functions defined in
``FILES`` and stamps them with one hash over all of those files, so a change in any of them
makes numba recompile all of them. Everything else (where the cache lives, file names, other
packages' functions) is left to numba's own locators, which ours wraps. Where the environment
names the locators (``NUMBA_CACHE_LOCATOR_CLASSES``), numba uses those and this stamp is not
applied: clear ``__pycache__`` after changing any of the fused modules.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["FILES", "install"]

_HERE = os.path.dirname(os.path.abspath(__file__))
#: The modules whose numba functions share the stamp (they call each other).
FILES = tuple(
    os.path.join(_HERE, name)
    for name in (
        "_vec16.py",
        "_tiles3x3.py",
        "_bounds3x3.py",
        "_factors.py",
        "_aos.py",
        "_columns.py",
        "_flags.py",  # codes, flags and the hyper-parameter layout are compiled in
        "_soa.py",
        "_lanes.py",
        "_layout.py",  # TILE is compiled in as a constant
        "_maths3x3.py",
        "_numba_cache.py",
        "_team.py",
    )
)
_STATE: dict = {}


def _stamp() -> bytes:
    if "stamp" not in _STATE:
        digest = hashlib.sha256()
        for path in FILES:
            with open(path, "rb") as fh:
                digest.update(hashlib.sha256(fh.read()).digest())
        _STATE["stamp"] = digest.digest()
    return _STATE["stamp"]


class _Stamped:
    """numba's own locator for a function, with the shared stamp added to its source stamp."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def get_source_stamp(self):
        return (_stamp(), self._inner.get_source_stamp())


def install() -> bool:
    """Put the shared-stamp locator first in numba's list (once); ``False`` where this numba
    has no such list (the functions are then cached per file, as numba does by default)."""
    if "installed" in _STATE:
        return _STATE["installed"]
    try:
        from numba.core import caching
    except ImportError:
        caching = None
    # ``CacheImpl`` in recent numba, ``_CacheImpl`` in older releases
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    classes = getattr(impl, "_locator_classes", None)
    if not isinstance(classes, list):
        _STATE["installed"] = False
        return False
    ours = {os.path.normcase(os.path.realpath(p)) for p in FILES}
    others = list(classes)

    class SharedStampLocator:
        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.normcase(os.path.realpath(py_file)) not in ours:
                return None
            for locator_class in others:
                inner = locator_class.from_function(py_func, py_file)
                if inner is not None:
                    return _Stamped(inner)
            return None

    classes.insert(0, SharedStampLocator)
    _STATE["installed"] = True
    return True
