"""One module per `gpt2lab` subcommand: argument parsing and printing only."""
