// Renders Go text/template cases for tests/test_gotemplate_vs_go.py with Go's own engine (what Ollama
// uses): reads a JSON array of {"template", "data"} on stdin, writes a JSON array of {"out"} or {"err"}.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Case struct {
	Template string         `json:"template"`
	Data     map[string]any `json:"data"`
}

type Result struct {
	Out *string `json:"out,omitempty"`
	Err string  `json:"err,omitempty"`
}

func render(c Case) Result {
	tmpl, err := template.New("t").Option("missingkey=zero").Parse(c.Template)
	if err != nil {
		return Result{Err: err.Error()}
	}
	var out strings.Builder
	if err := tmpl.Execute(&out, c.Data); err != nil {
		return Result{Err: err.Error()}
	}
	text := out.String()
	return Result{Out: &text}
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	results := make([]Result, len(cases))
	for i, c := range cases {
		results[i] = render(c)
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		panic(err)
	}
}
