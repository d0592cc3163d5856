"""Tables and figures for runs and sweeps."""
