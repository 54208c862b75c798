"""``python -m gpusm`` runs the command line."""

from gpusm.cli.main import main

main()
