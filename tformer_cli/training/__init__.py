"""Training: settings, optimizer and schedule, loss, resumable state, torch.distributed, the
loop shared by pretraining and fine-tuning, and the two recipes built on it."""
