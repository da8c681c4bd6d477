"""`python -m iotmesh` is the same as the `iotmesh` command."""

from iotmesh.cli.main import main

main()
