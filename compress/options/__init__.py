"""Every flag defined once: its config group, its default, its bound and its one line of help."""
