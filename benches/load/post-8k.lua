-- wrk script: every request is a POST with an 8 KiB body (wrk adds Content-Length). Through tokenproxy this body
-- is kept in the replay buffer (server.replay_buffer, 64 KiB by default) in case the upstream answers 401.
wrk.method = "POST"
wrk.body = string.rep("x", 8192)
wrk.headers["Content-Type"] = "application/octet-stream"
