// An on/off switch read from the environment: unset, "" or "0" is off, "1" is on, anything else
// raises ValueError naming the variable (torch-free callers see a c10::ValueError too).
#pragma once

namespace ep {

bool env_switch(const char* name, const char* value);  // value: the variable's, or null where unset
bool env_switch(const char* name);                      // std::getenv(name)
bool env_switch_on_by_default(const char* name);        // the same, but unset or "" is on

}  // namespace ep
