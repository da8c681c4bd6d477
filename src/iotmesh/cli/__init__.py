"""The `iotmesh` command: thin commands over the platform and its REST API."""
