"""Training: the loop, checkpoints, metrics and launching.

``paratrain.train`` is both this package and the API function ``paratrain.train(config, ...)``
(:func:`paratrain.api.train`): once any ``paratrain.train.*`` module is imported, Python binds
the package to that attribute, so the package itself forwards calls to the function.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from paratrain.api import train

        return train(*args, **kwargs)

    @property
    def __signature__(self):  # inspect.signature(paratrain.train) shows the function's
        import inspect

        from paratrain.api import train

        return inspect.signature(train)


sys.modules[__name__].__class__ = _CallablePackage
