"""TELL — Token-Efficient Leverage Learning (arXiv 2404.00914) as a toolkit and CLI."""
__version__ = "0.1.0"
