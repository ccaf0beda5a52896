"""AI gateway for mitmproxy: policies and exact token metering for OpenAI Realtime and HTTP APIs."""
