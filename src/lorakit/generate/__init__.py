"""Drawing with LoRAs the way AUTOMATIC1111 users do: prompt syntax, PNG info."""
