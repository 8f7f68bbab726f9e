"""Build hooks; the metadata is in pyproject.toml.

* The two C extensions (``engine._ringcore``, ``engine._cborcore``) are the fast path but
  not a requirement: an extension that does not compile (no compiler, no Python headers,
  ``CC=/bin/false``) is reported and skipped, and fluxrig runs its pure-Python twin
  (``engine/_native.py`` says which is in use; ``engine version --verbose`` shows it).
* The shipped rig files (``configs/*.yaml``) go into the package as ``engine/configs`` so
  ``engine demo`` finds them in a non-editable install (``engine/rigs.py``).
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.errors import CCompilerError, ExecError, PlatformError

# Everything a missing or failing toolchain raises while building one extension.
_BUILD_ERRORS = (CCompilerError, ExecError, PlatformError, OSError)


class OptionalBuildExt(build_ext):
    """``build_ext`` that skips, with a warning, an extension that does not build."""

    def run(self) -> None:
        try:
            super().run()
        except _BUILD_ERRORS as exc:  # no usable compiler at all
            self._skip("all C extensions", exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except _BUILD_ERRORS as exc:
            self._skip(ext.name, exc)

    def _skip(self, what: str, exc: BaseException) -> None:
        self.warn(f"fluxrig: not building {what} ({type(exc).__name__}: {exc}); "
                  f"the pure-Python path will be used (slower; see `engine version --verbose`)")


class BuildPyWithConfigs(build_py):
    """``build_py`` that also copies ``configs/*.yaml`` into the built ``engine/configs``."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "engine" / "configs"
        self.mkpath(str(target))
        for rig in sorted(Path("configs").glob("*.yaml")):
            self.copy_file(str(rig), str(target / rig.name))


setup(
    cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPyWithConfigs},
    ext_modules=[
        Extension(
            "engine._ringcore",
            sources=["engine/_ringcore.c"],
            extra_compile_args=["-O2", "-std=c11"],
        ),
        Extension(
            "engine._cborcore",
            sources=["engine/_cborcore.c"],
            extra_compile_args=["-O2", "-std=c11"],
        ),
    ],
)
