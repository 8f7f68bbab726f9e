"""Build hook for the one C extension (engine._ringcore); all metadata is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "engine._ringcore",
            sources=["engine/_ringcore.c"],
            extra_compile_args=["-O2", "-std=c11"],
        )
    ]
)
