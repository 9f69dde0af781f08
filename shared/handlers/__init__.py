"""The pure batch handlers of the stream processors: a batch of parsed events (and the
state they need) in, the events to publish (and the new state) out. No Kafka here: the
services' entry points wire them to topics, and the lab replays them in process."""
