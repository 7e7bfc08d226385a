"""Sub-commands of the dorafit command line (see dorafit.cli)."""
