"""The compiled nearest-code kernel (plain C against the Python headers, no torch headers). Optional: without a C
compiler the plugin still installs and rounds through the core's torch path, to the same codes, more slowly."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "slimquant_nf4._nearest",
    ["src/slimquant_nf4/_nearest.c"],
    extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing"],
    extra_link_args=["-pthread"],
    optional=True,
)])
