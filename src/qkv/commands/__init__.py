"""Sub-commands of the ``qkv`` CLI, one module each (see :mod:`qkv.cli`)."""
