"""The steps, one module each: distill, finetune, prune, share, evaluate, export and bench, taking grouped configs
and returning what they made."""
