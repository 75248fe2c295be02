"""One module per subcommand: each turns a validated recipe into work and results."""
