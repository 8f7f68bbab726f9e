"""Build hook for the C extensions (engine._ringcore, engine._cborcore); metadata is in
pyproject.toml."""

from setuptools import Extension, setup

setup(
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
    ]
)
