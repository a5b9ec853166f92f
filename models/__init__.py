"""fedslim model zoo, datasets, partitioners and counting.

`models.__version__` is the single version source of the distribution.
"""

__version__ = "0.1.0"
