"""HTTP and WebSocket routes of the API (audio front ends live in telephony/)."""
