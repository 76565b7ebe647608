"""The ``mojo-opset`` command-line tools: ``info``, ``compare`` and ``bench``."""
