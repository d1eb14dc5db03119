"""What every layer leans on: errors, output paths, MLflow stores, signals, lineage files and fingerprints."""
