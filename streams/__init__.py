"""Fan-out: the event envelope, the relay (event log → Kafka), faust workers and the embedded
in-process path that feeds projectors straight from the log."""
