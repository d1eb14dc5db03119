"""The command line: flat flags into configs, one API call a command, the result printed; errors as one line."""
