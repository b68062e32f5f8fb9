from meshctl.cli import main

# The name shell completion and usage lines use, however meshctl was started (`python -m meshctl` too).
main(prog_name="meshctl")
