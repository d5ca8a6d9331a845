"""The training engine: device and precision, augmentation, optimisers and schedules, the epoch, evaluation,
and the loop with checkpoints. Nothing here knows a method."""
