"""``python -m onnxft ...`` is the ``onnxft`` command."""
from .cli.main import main

main()
