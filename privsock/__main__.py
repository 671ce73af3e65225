"""`python -m privsock`: the `privsock` command (privsock.cli)."""

from privsock.cli import main

main()  # exits with the command's status
