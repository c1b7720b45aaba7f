"""Admission and resource control (ARCHITECTURE §5).

* `semaphores`: distributed counting semaphores in the state database — global,
  per host, per image, per quota — taken all-or-none per episode.
* `hosts`: the registry of env hosts (capacity, images, heartbeat) and placement.
* `quotas`: administrative limits per user and project.
* `admission`: FIFO admission. An episode that finds no room waits (its start
  message is parked in its row); an episode that ends admits the next waiters.
* `scale`: the elasticity signal (backlog and recommended workers per pool).
"""
