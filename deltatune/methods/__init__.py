"""One file per method, named as the registry names it (``lora.py`` is ``lora``). Importing this package imports
no method: deltatune.registry imports each the first time it is asked for."""
