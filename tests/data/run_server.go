// A static Go server for tests/test_run.py: net.Listen and net.ListenPacket call
// bind() through Go's own syscall package, never libc.
package main

import (
	"fmt"
	"net"
	"os"
)

func main() {
	ln, err := net.Listen("tcp", "127.0.0.1:80")
	if err != nil {
		fmt.Println("listen:", err)
		os.Exit(1)
	}
	pc, err := net.ListenPacket("udp", "127.0.0.1:53")
	if err != nil {
		fmt.Println("listenpacket:", err)
		os.Exit(1)
	}
	_, err = net.Listen("tcp", "127.0.0.1:22")
	fmt.Println("ready", err)
	go func() {
		buf := make([]byte, 512)
		n, addr, _ := pc.ReadFrom(buf)
		pc.WriteTo(append([]byte("go-udp:"), buf[:n]...), addr)
	}()
	c, err := ln.Accept()
	if err != nil {
		os.Exit(1)
	}
	c.Write([]byte("go-tcp\n"))
	c.Close()
}
