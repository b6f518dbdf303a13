# record-offload %post: make systemd see the new unit. The service is neither enabled nor
# started here: the operator does that once the config and the secret are in place.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
	echo "record-offload is installed but not started. Edit /etc/record-offload/config.toml,"
	echo "put the storage secret in /etc/record-offload/secret (mode 0600), check with"
	echo "'record-offload check-config', then: systemctl enable --now record-offload"
fi
exit 0
