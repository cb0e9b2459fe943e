"""``python -m keras_fim_cli``: the ``keras-fim`` command."""

from keras_fim_cli import main

main(prog_name="keras-fim")
