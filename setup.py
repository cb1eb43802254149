"""Build of cybn's compiled kernels.

Environment switches (all optional):
  CYBN_NATIVE=1          compile for the build machine's CPU (-march=native)
  CYBN_BOUNDSCHECK=1     turn Cython's bounds and wraparound checks back on
  CYBN_NO_OPENMP=1       build without OpenMP (kernels then run serially)
  CYBN_SANITIZE=1        build with AddressSanitizer and UndefinedBehaviorSanitizer
                         (run Python with the ASan runtime in LD_PRELOAD; see README)
"""
import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def flag(name):
    return os.environ.get(name, "") not in ("", "0")


compile_args = [
    "-O3",
    # No contraction of a*b+c into fma: results are then the same on every
    # machine and instruction set, not only for every thread count.
    "-ffp-contract=off",
    # Floating-point compares may be if-converted (the ReLU and its mask
    # vectorize); cybn never reads the floating-point exception flags.
    "-fno-trapping-math",
    # sqrt without setting errno for negative input (its result is the same
    # IEEE value), so that loops over channels vectorize it: computing
    # 1/sqrt(var + eps) for 2048 channels went from 11.6 to 6.2 us.
    "-fno-math-errno",
    # The 8-lane vector helpers in _loops.h are always inlined; GCC still
    # warns that their ABI would differ between the target clones.
    "-Wno-psabi",
]
# No debug information in the shipped binaries (Python's own CFLAGS carry -g:
# the .so files were 10 MB with it, 2.3 MB without).  CYBN_SANITIZE keeps it.
release_args = ["-g0"]
link_args = []
macros = [("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")]
if flag("CYBN_NATIVE"):
    compile_args.append("-march=native")
    macros.append(("CYBN_NATIVE", "1"))  # no run-time dispatch: one native clone
if not flag("CYBN_NO_OPENMP") and sys.platform != "win32":
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
elif sys.platform != "win32":
    compile_args.append("-fopenmp-simd")  # the `omp simd` hints still apply

if flag("CYBN_SANITIZE"):
    sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                  "-fno-omit-frame-pointer"]
    compile_args += sanitizers + ["-O1", "-g"]
    link_args += sanitizers
else:
    compile_args += release_args
    link_args.append("-Wl,--strip-debug")

checks = flag("CYBN_BOUNDSCHECK")
directives = {
    "language_level": 3,
    "boundscheck": checks,
    "wraparound": checks,
    "initializedcheck": checks,
    "cdivision": True,
}

extensions = [
    Extension(
        "cybn._kernels",
        ["cybn/_kernels.pyx"],
        include_dirs=[np.get_include(), "cybn"],
        define_macros=macros,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        depends=["cybn/_loops.h", "cybn/_loops_impl.h"],
    )
]
# The argument checks, compiled as they are written: plain Python, with
# Python's semantics (Cython's defaults, not the kernels' directives).  About
# 2 us less per call, a quarter of a small tensor's overhead.
checks_module = Extension("cybn._api", ["cybn/_api.py"], define_macros=macros,
                          extra_compile_args=[] if flag("CYBN_SANITIZE") else release_args,
                          extra_link_args=[] if flag("CYBN_SANITIZE") else ["-Wl,--strip-debug"])


def description():
    """The README up to its end-of-description marker: what a package index
    shows.  The rest of the README (API, guarantees, links) is for a clone."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
        text = f.read()
    head = text.split("<!-- end of description -->")[0].rstrip()
    return head + ("\n\nDocumentation, guarantees and benchmarks: the README.md and docs/ "
                   "of the source distribution.\n")


setup(ext_modules=cythonize(extensions, compiler_directives=directives)
      + cythonize([checks_module], compiler_directives={"language_level": 3}),
      long_description=description(),
      long_description_content_type="text/markdown")
