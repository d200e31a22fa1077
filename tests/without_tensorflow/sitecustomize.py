"""On PYTHONPATH, this makes a Python in which TensorFlow cannot be imported and importlib cannot find it, as in an
install without it (requirements-jax.txt): the tests run the script's JAX paths so, and a stray `import tensorflow`
fails them."""

import importlib.machinery
import sys


class WithoutTensorFlow(importlib.machinery.PathFinder):
    """The path finder, blind to TensorFlow."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] == "tensorflow":
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[:] = [WithoutTensorFlow if finder is importlib.machinery.PathFinder else finder
                    for finder in sys.meta_path]
