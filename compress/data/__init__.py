"""Tasks and their rows: GLUE, BBC News and folders of files read into TaskData, and the Lightning data module."""
