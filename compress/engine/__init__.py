"""Training machinery: the LightningModule, the Trainer, one run from data to saved model, its state and resume."""
