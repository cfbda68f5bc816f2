"""Hand-written fakes for tests: a real-HTTP fake provider server and friends."""
