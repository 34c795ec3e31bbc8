"""The web console's files (index.html, console.js, console.css), served by ota_bridge/api/console.py."""
