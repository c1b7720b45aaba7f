"""The RL loop: batches for trainers, losses, the reference trainer."""
